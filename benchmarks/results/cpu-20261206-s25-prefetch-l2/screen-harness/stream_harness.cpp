#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <omp.h>
#include <sys/mman.h>
#include <algorithm>
typedef long long ll;
const ll V=49152, kp=576;
#define T __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl")))
// variant: mode 0 = pairs with T0 prefetch AH rows ahead; 1 = NTA; 2 = none; meta: read meta streams + write hi/lo
template<int HINT, bool META>
T void run(const int8_t* q, const uint8_t* u, const float* meta, float* out, ll v0, ll v1, int ah) {
  for (ll v=v0; v+8<=v1; v+=8) {
    __m512i part[16];
    const int8_t* qb=q+v*kp;
    for (int j=0;j<8;j+=2) {
      const int8_t* qj=qb+j*kp;
      __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0;
      for (ll c=0;c<kp;c+=64) {
        if (HINT>=0) { _mm_prefetch((const char*)(qj+ah*kp+c),(_mm_hint)HINT); _mm_prefetch((const char*)(qj+(ah+1)*kp+c),(_mm_hint)HINT);}
        __m512i w0=_mm512_loadu_si512(qj+c), w1=_mm512_loadu_si512(qj+kp+c);
        __m512i x1=_mm512_loadu_si512(u+c), x2=_mm512_loadu_si512(u+kp+c);
        a0=_mm512_dpbusd_epi32(a0,x1,w0); a1=_mm512_dpbusd_epi32(a1,x1,w1);
        a2=_mm512_dpbusd_epi32(a2,x2,w0); a3=_mm512_dpbusd_epi32(a3,x2,w1);
      }
      part[j]=a0; part[j+1]=a1; part[8+j]=a2; part[9+j]=a3;
    }
    __m512i s=part[0]; for(int i=1;i<16;i++) s=_mm512_add_epi32(s,part[i]);
    __m256 r=_mm256_cvtepi32_ps(_mm512_castsi512_si256(s));
    if (META) {
      for (int k=0;k<4;k++) r=_mm256_add_ps(r,_mm256_loadu_ps(meta+k*V+v));
      _mm256_storeu_ps(out+v,r); _mm256_storeu_ps(out+V+v,r);
    } else {
      _mm256_storeu_ps(out+v,r);
    }
  }
}
int main(int argc,char**argv){
  int huge=atoi(argv[1]);
  const int NH=4; ll bytes=V*kp;
  int8_t* q[NH]; float* meta[NH];
  for(int h=0;h<NH;h++){
    q[h]=(int8_t*)mmap(0,bytes+(4<<20),PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
    q[h]=(int8_t*)(((uintptr_t)q[h]+(2<<20)-1)&~((uintptr_t)(2<<20)-1));
    if(huge) madvise(q[h],bytes,MADV_HUGEPAGE);
    for(ll i=0;i<bytes;i++) q[h][i]=(int8_t)(i*7);
    meta[h]=(float*)aligned_alloc(64,4*V*4); for(ll i=0;i<4*V;i++) meta[h][i]=1;
  }
  uint8_t* u=(uint8_t*)aligned_alloc(64,2*kp); memset(u,3,2*kp);
  float* out=(float*)aligned_alloc(64,2*V*4);
  auto bench=[&](const char* name, auto fn){
    double best[9]; 
    for(int r=0;r<9;r++){
      auto t0=std::chrono::steady_clock::now();
      for(int h=0;h<NH;h++){
        #pragma omp parallel num_threads(2)
        { int t=omp_get_thread_num(); ll half=V/2; fn(q[h],meta[h],t*half,(t+1)*half); }
      }
      best[r]=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count()/NH;
    }
    std::sort(best,best+9);
    printf("%-28s %.3f ms  %.1f GB/s\n",name,best[4]*1e3,bytes/best[4]/1e9);
  };
  for(int rep=0;rep<2;rep++){
  bench("T1 16",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T1,true>(q,u,m,out,a,b,16);});
  bench("T1 32",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T1,true>(q,u,m,out,a,b,32);});
  bench("T1 48",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T1,true>(q,u,m,out,a,b,48);});
  bench("T1 64",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T1,true>(q,u,m,out,a,b,64);});
  bench("T1 128",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T1,true>(q,u,m,out,a,b,128);});
  bench("T2 32",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T2,true>(q,u,m,out,a,b,32);});
  bench("T2 64",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T2,true>(q,u,m,out,a,b,64);});
  bench("T0 16",[&](const int8_t*q,const float*m,ll a,ll b){run<_MM_HINT_T0,true>(q,u,m,out,a,b,16);});
}
}
